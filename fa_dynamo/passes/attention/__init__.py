"""The attention pass (``fuse.AttentionPass``) and what it is made of: the SDPA and hand-written
softmax front ends (``sdpa``, ``manual_softmax``), the walk and fold of the score chain
(``score_walk``, ``score_chain``), mask lifting (``mask_lifting``, ``mask_segments``), the matched
site (``site``) and the rewrite to ``fa_dynamo::attention`` (``rewrite``)."""
