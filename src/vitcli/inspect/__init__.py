"""Looking inside a ViT: the paper's inspection figures (`vit inspect`) and training curves (`vit plot`).

    features   the numbers behind each figure (filter PCA, position-embedding similarity, attention
               distance, attention rollout), tested against direct computations
    figures    matplotlib drawing of those numbers (Agg canvas, no pyplot state)
    run        `vit inspect`: checkpoint + images -> PNGs + inspect.json
    plots      `vit plot`: metrics.jsonl of one or more runs -> loss / lr / top-1 against steps
"""
