"""Stage 4, analysis: metrics against PCA and CE recovered (``evaluate``), top contexts and logit lens (``analyse``),
explanations in words (``explain``), steering and attribution (``steer``, ``attribute``) through one splice
(``splice``), and the static feature browser (``dashboard``). Imports ``sae.data`` and ``sae.saes``, never
``sae.training``."""
