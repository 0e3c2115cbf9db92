"""CNN codes inside a scikit-learn Pipeline, with a grid search over the probe's C that extracts each image once.

python examples/sklearn_pipeline.py
"""

import sys
import tempfile
from pathlib import Path

from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

import cnncodes

sys.path.insert(0, str(Path(__file__).parent))
from _data import make_folder  # noqa: E402

work = Path(tempfile.mkdtemp())
source = cnncodes.open_source(make_folder(work / "images"))
paths, labels = source.ids, source.labels
pipe = Pipeline([("codes", cnncodes.CNNCodes(model="resnet18:none", input_size=32, taps="layer2.1.relu_1", poolings="avg", memory=str(work / "cache"))),
                 ("probe", cnncodes.TorchLogisticRegression())])  # fmt: skip
search = GridSearchCV(pipe, {"probe__C": [0.01, 0.1, 1.0]}, cv=3).fit(paths, labels)
print("best C:", search.best_params_["probe__C"], "CV accuracy:", round(search.best_score_, 3))
