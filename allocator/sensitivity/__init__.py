"""Per-(unit, level) sensitivities on the model's own scale, and models fitted to measured plans.

``error``: relative output error ‖ΔW X‖²/‖W X‖² of the layer (cheap, but not comparable across layers);
``fisher``: ½ Σ_i f_i (ΔW Σ ΔWᵀ)_ii, the layer's output error weighted by the Fisher of the model's own
predictions (predicts KL in nats); ``kl``: measured KL to dense with only that layer compressed;
``fitted``: per-unit weights on the ``kl`` (if measured) or ``fisher`` prior, fitted to the measured KL of real plans.
"""

from __future__ import annotations

SENSITIVITIES = ("error", "fisher", "kl", "fitted")
