"""Datasets, the checksummed download, the split over clients, augmentation."""
