"""Zebra-Llama distillation: a Llama becomes a trained hybrid of MLA and Mamba2 layers.

* :mod:`compress.distill.ild`: intermediate layer distillation, a layer method of the walk
  (teacher-forced, both replacement mixers of every layer);
* :mod:`compress.distill.smart`: SMART, which layers become MLA (the rule apart from the measurement);
* :mod:`compress.distill.kd`: the hybrid assembled from the distilled mixers, and end-to-end KD on the
  shared training loop (KL to the teacher's logits);
* :mod:`compress.distill.run`: the whole pipeline with its resume state (:mod:`compress.distill.state`),
  behind ``compress distill`` (:mod:`compress.cli.distill_cmd`) and the ``zebra-distill`` recipe stage
  (:mod:`compress.distill.method`); :mod:`compress.distill.plan` checks everything before any work.

See docs/distill.md.
"""
