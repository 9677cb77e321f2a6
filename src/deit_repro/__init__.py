"""deit-repro: a workflow-orchestrated reproduction of DeiT (Touvron et al., ICML 2021)."""

__version__ = "0.1.0"
