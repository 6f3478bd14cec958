"""The detector: torchvision Faster R-CNN with multi-label RoI heads and a pluggable classification loss, its
backbones, and the classifier switch from a softmax stage 1 to a sigmoid-type stage 2."""
