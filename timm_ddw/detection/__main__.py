"""``python -m timm_ddw.detection SCRIPT [ARGS]``: run a script (torchvision's reference
``train.py``) with the ``fasterrcnn_<model>_fpn`` builders registered in torchvision."""
import sys

from ..run import main
from . import TORCHVISION_NAMES  # noqa: F401  (registers the builders)

if __name__ == '__main__':
    sys.exit(main())
