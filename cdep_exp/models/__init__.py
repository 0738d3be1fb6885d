"""Model architectures, one small file each; every model returns logits."""
from cdep_exp.models.lstm import LSTMClassifier
from cdep_exp.models.mlp import MLP
from cdep_exp.models.mnist_cnn import MNISTCNN

__all__ = ["LSTMClassifier", "MLP", "MNISTCNN"]
