"""Extraction shards as Dask tasks, merged into one store, then a sweep on the same Dask cluster.

    python examples/scale_out.py [WORKDIR]

A local cluster stands in for a real one: give `distributed.Client` your scheduler's address instead, with the
images and the store on storage every worker can read. Needs the dask extra (`pip install -e ".[dask]"`).
"""

import sys
import tempfile
from pathlib import Path

import joblib
from distributed import Client, LocalCluster

import cnncodes

sys.path.insert(0, str(Path(__file__).parent))
from _data import make_folder  # noqa: E402


def extract_shard(index: int, count: int, images: Path, out: Path) -> str:
    store = cnncodes.extract(images, out=out, shard=(index, count), model="resnet18:none", input_size=32,
                             taps="stages", poolings="avg,avg2", batch_size=8, progress=False)  # fmt: skip
    return f"shard {index}/{count}: {store.rows} rows in {store.path}"


if __name__ == "__main__":
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    images = make_folder(work / "images")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        for line in client.gather(client.map(extract_shard, range(3), count=3, images=images, out=work / "codes")):
            print(line)
        store = cnncodes.merge_shards(work / "codes", remove_shards=True)
        print(f"merged: {store.rows} rows x {len(store.arrays)} arrays")
        with joblib.parallel_config(backend="dask"):
            result = cnncodes.sweep(store, cnncodes.SweepConfig(probes=("logreg",), folds=3), jobs=-1, progress=False)
    print("best layer:", result.best.tap, result.best.pooling, f"test accuracy {result.best.test_accuracy:.3f}")
