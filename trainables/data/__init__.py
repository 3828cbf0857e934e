"""What turns files into batches: data roots (folders, buckets), layouts and manifests,
the scan and its splits, image decoding, transforms, packs and the loaders that feed a trial."""
