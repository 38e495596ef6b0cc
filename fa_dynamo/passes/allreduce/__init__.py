"""The tiling-AllReduce pass (``tiling.AllReducePass``) and its cost model (``cost``)."""
