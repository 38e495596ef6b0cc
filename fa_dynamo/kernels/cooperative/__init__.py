"""The CPU-GPU cooperative strategy for KV caches longer than device memory: the op
(``op``: host and device shares merged by log-sum-exp) and the host → device block staging
(``staging``)."""
