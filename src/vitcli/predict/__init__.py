"""`vit predict`: classify images with a trained checkpoint, as `vit eval` would see them.

    for row in predict("runs/digits16", ["photos/", "more/*.png"], topk=3):
        print(row.path, row.top)           # [(label, index, probability), ...], best first

Images are found (files, folders searched recursively, globs), indexed into a `datasets.Dataset` of paths
and fed through the checkpoint's own eval transform (normalisation, interpolation, crop) by the same
loader and batching as `vit eval`, so the top-1 agrees with it exactly. Results stream out batch by
batch. An unreadable image is skipped and named (`Predictions.skipped`).
"""

from vitcli.predict.run import PARTIAL_EXIT_CODE, Prediction, Predictions, find_images, predict

__all__ = ["PARTIAL_EXIT_CODE", "Prediction", "Predictions", "find_images", "predict"]
