"""The network: timm backbones (creation, pretrained weights, freezing) and checkpoints
(weights, metadata, per-class metrics, resumable state)."""
