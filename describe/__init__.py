"""THE description path: `describe.describe` (images + model + quality -> descriptors,
batched, with progress) and `describe.cache` (THE descriptor cache and the image identity)."""
