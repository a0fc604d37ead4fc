"""Preprocess stage: OpenCV decoding for PyTorch DataLoaders and the offline ``imgfeat prep`` export."""
