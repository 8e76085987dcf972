"""Training objectives: modules that turn a batch into `loss, metrics = objective(batch)`.

An objective holds the model (and any trainable parts of its own) so the engine wraps it once with
DDP/FSDP, and says what its evaluations report (`evaluate`, `eval_metrics`, `best_metric`). The
engine knows nothing else about it. Today: `supervised` (Classification), the paper's.
"""

from vitcli.objectives.evaluate import ECE_BINS, EvalAccumulator, evaluate
from vitcli.objectives.supervised import Classification

__all__ = ["ECE_BINS", "Classification", "EvalAccumulator", "evaluate"]
