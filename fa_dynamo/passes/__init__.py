"""Graph passes: each rewrites one pattern of the normalized ATen graph (see ``manager.PASSES``)."""
