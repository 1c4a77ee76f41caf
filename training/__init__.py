"""underfire.training: the data an audit reads (Fashion-MNIST, photos, folders) and the training loops of the
bundled models and of RTS / RTS^A.

    from underfire.training import fashion_mnist, load_images, photos
"""

from underfire.training.data import DataError, ImageFolderDataset, fashion_mnist, load_images, photos, stack

__all__ = ["DataError", "ImageFolderDataset", "fashion_mnist", "load_images", "photos", "stack"]
