"""Stage 3, training: the loop over a data source (``train``), one SAE's optimiser step (``trainer``), torchrun data
parallelism (``distributed``), latents split across processes (``sharded``) and the memory plan (``plan``). Imports
``sae.data`` and ``sae.saes``, never ``sae.analysis``."""
