from .features import DataLike, DeviceLike, collapse_stats, extract_features, knn_accuracy, knn_predict, linear_probe, _check_int

__all__ = ["extract_features", "knn_predict", "knn_accuracy", "linear_probe", "collapse_stats"]
