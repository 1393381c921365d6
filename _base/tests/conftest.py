import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

try:  # ranks are forked from this process: a torch op here with an OpenMP thread pool running
    import torch  # would leave the children's first parallel op waiting on threads they do not have

    torch.set_num_threads(1)
except ImportError:
    pass
