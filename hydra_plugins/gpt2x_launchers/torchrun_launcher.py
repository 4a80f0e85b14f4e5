"""`hydra/launcher=torchrun` (conf/hydra/launcher/torchrun.yaml); the code is in gpt2x.lab.launch.

Hydra registers a plugin under the module that defines its class and only instantiates ones
from `hydra_plugins.*`, hence this subclass rather than a re-export.
"""

from gpt2x.lab.launch import TorchrunLauncher as _TorchrunLauncher


class TorchrunLauncher(_TorchrunLauncher):
    __doc__ = _TorchrunLauncher.__doc__
