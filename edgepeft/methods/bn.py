"""BatchNorm affine tuning with frozen running statistics (TinyTL): ``y = bn(x) + ds·x̂ + db``, x̂ = (x - mean) / sqrt(var + eps).

``ds`` (kind ``bn_scale``) is the delta of the norm's scale γ, ``db`` the delta of its shift β; the shift is
BitFit's ``bias`` kind (one owner per kind), so ``bn`` alone trains both and ``bn+bitfit`` trains each once.
The running mean and variance stay those of the base model: a device's small batches never re-estimate them.
Neutral zero, mixed by weighted sum, averaged as is. PEFT has no such method (it would be ``modules_to_save``).
"""

from __future__ import annotations

from edgepeft.errors import ExportError
from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import Method, MethodConfig, ModelView
from edgepeft.names import BIAS, BN_SCALE, slot_name


class BatchNormTuning(Method):
    name = "bn"
    kinds = (BN_SCALE,)

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        if not view.norms:
            raise ExportError("--method bn: the model has no BatchNorm layers; choose bitfit or lora")
        return [Slot(slot_name(name, kind), kind, name, (c,)) for name, c in view.norms.items() if view.in_scope(name)
                for kind in (BN_SCALE, BIAS)]


BN = register(BatchNormTuning())
