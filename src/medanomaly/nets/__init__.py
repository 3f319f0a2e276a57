"""Network parts MONAI does not provide (token transformers, positional encodings, the shared MAE backbone)."""
