"""Tools that work on trained runs, apart from the training core: the interaction diagnosis of a
CDEP-trained model and Grad-CAM maps."""
