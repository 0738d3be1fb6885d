"""Model architectures, one small file each; every model returns logits."""
from cdep_exp.models.lstm import LSTMClassifier
from cdep_exp.models.mlp import MLP
from cdep_exp.models.mnist_cnn import MNISTCNN
from cdep_exp.models import cd_rules  # noqa: F401  (registers the text classifiers' CD rules)

__all__ = ["LSTMClassifier", "MLP", "MNISTCNN"]
