"""Extract codes at every stage of a backbone and find the best layer.

python examples/layer_sweep.py [WORKDIR] [--model resnet18:none --input-size 32]
"""

import sys
import tempfile
from pathlib import Path

import cnncodes

sys.path.insert(0, str(Path(__file__).parent))
from _data import make_folder  # noqa: E402

work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
images = make_folder(work / "images")
store = cnncodes.extract(
    images, out=work / "codes", model="resnet18:none", input_size=32, taps="stages", poolings="avg,avg2", progress=False
)
result = cnncodes.sweep(store, cnncodes.SweepConfig(probes=("logreg",), folds=3), progress=False)
print(cnncodes.format_table(result))
cnncodes.write_report(result, work / "sweep")
print("best layer:", result.best.tap, result.best.pooling)
