"""Sweep, save the best probe as a safe bundle, predict new images with it and export it to TorchScript.

python examples/deploy_probe.py
"""

import sys
import tempfile
from pathlib import Path

import cnncodes

sys.path.insert(0, str(Path(__file__).parent))
from _data import make_folder  # noqa: E402

work = Path(tempfile.mkdtemp())
store = cnncodes.extract(
    make_folder(work / "images"),
    out=work / "codes",
    model="resnet18:none",
    input_size=32,
    taps="last:2",
    progress=False,
)
result = cnncodes.sweep(store, cnncodes.SweepConfig(probes=("logreg",), folds=3), progress=False)
bundle_path = cnncodes.save_probe(result, work)
probe = cnncodes.load_bundle(bundle_path)
new = make_folder(work / "new", per_class=2)
for row in probe.predict_source(new):
    print(Path(row["path"]).parent.name, "->", row["predicted"])
print("exported", cnncodes.export_probe(probe, work / "probe.pt"))
