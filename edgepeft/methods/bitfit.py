"""BitFit: an additive delta on the bias of every linear module in scope, ``y = base(x) + db``.

Neutral zero, mixed by weighted sum, averaged as is. The head's bias slots are of this kind too.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgepeft.manifest import Slot
from edgepeft.methods import register
from edgepeft.methods.base import Method, MethodConfig, ModelView, option
from edgepeft.names import BIAS, slot_name


@dataclass(frozen=True)
class BitFitConfig(MethodConfig):
    exclude: tuple[str, ...] | None = option(None, "Leaf module names whose bias is not trained. Default: the family's "
                                                   "key projection (softmax makes its bias gradient zero).")


class BitFit(Method):
    name = "bitfit"
    kinds = (BIAS,)
    config_cls = BitFitConfig

    def plan(self, view: ModelView, config: MethodConfig) -> list[Slot]:
        assert isinstance(config, BitFitConfig)
        exclude = config.exclude if config.exclude is not None else view.default("bitfit.exclude")
        # A CNN's shifts live in its BatchNorms (the convolutions before them have no bias): both are trained.
        sized = {**{n: fout for n, (_, fout) in view.linears.items() if n not in view.no_bias}, **view.norms}
        return [Slot(slot_name(name, BIAS), BIAS, name, (fout,)) for name, fout in sized.items()
                if view.in_scope(name) and name.rsplit(".", 1)[-1] not in exclude]


BITFIT = register(BitFit())
