import os

# No network in tests and CI: timm / huggingface must never try to download weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
