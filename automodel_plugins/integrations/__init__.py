"""Doors for trainers built on transformers, each importing its own tool (install it yourself):

* ``trl``: TRL's ``SFTTrainer`` with this project's fused loss (``FusedLossSFTMixin``, ``SFTTrainer``).
"""
