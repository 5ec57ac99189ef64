"""The paper's two recipes as presets of the scripts' flags: CIFAR (App. D, the default) and ImageNet
(Sec. 4 and App. A, as the official code runs it), with the augmentation and test transform of each.

A flag given on the command line overrides its recipe's value; a flag left out (None after parsing) takes
it, and its name goes into `from_recipe`, which the run's args.json keeps with every resolved value. The
ImageNet recipe's fixed predictor lr is dropped for a predictor that is not trained (--predictor none or
fixed); given explicitly there, --fix_pred_lr is refused.
"""
import augment
from probe import LR_GRID, PROBE_NORM

RECIPES = ('cifar', 'imagenet')

# pretraining (main.py): the model, the optimizer, the schedule's length and the image size
PRETRAIN = {
    'cifar': {'arch': 'resnet50', 'stem': 'auto', 'image_size': None, 'feature_dim': 2048, 'pred_dim': 512,
              'proj_hidden_dim': 2048, 'proj_layers': 2, 'proj_out_affine': 'on', 'lr': 0.03, 'wd': 5e-4,
              'momentum': 0.9, 'batch_size': 512, 'epochs': 800, 'fix_pred_lr': False, 'knn_bank': 0,
              'knn_queries': 0},
    'imagenet': {'arch': 'resnet50', 'stem': 'imagenet', 'image_size': 224, 'feature_dim': 2048,
                 'pred_dim': 512, 'proj_hidden_dim': 2048, 'proj_layers': 3, 'proj_out_affine': 'off',
                 'lr': 0.05, 'wd': 1e-4, 'momentum': 0.9, 'batch_size': 512, 'epochs': 100,
                 'fix_pred_lr': True, 'knn_bank': 100000, 'knn_queries': 10000},
}
# linear evaluation (linear.py): the CIFAR one is this project's probe study's; the ImageNet one the
# official protocol (a plain head, LARS, batch 4096, lr 0.1, 90 epochs)
LINEAR = {
    'cifar': {'lr': LR_GRID, 'probe_norm': PROBE_NORM, 'optimizer': 'sgd', 'momentum': 0.9, 'batch_size': 256,
              'epochs': 90},
    'imagenet': {'lr': [0.1], 'probe_norm': 'none', 'optimizer': 'lars', 'momentum': 0.9, 'batch_size': 4096,
                 'epochs': 90},
}
# (pretraining augmentation, linear-evaluation augmentation, test transform's resize / image size)
AUGMENTATION = {
    'cifar': (augment.PRETRAIN, augment.LINEAR, 1.0),
    'imagenet': (augment.IMAGENET_PRETRAIN, augment.IMAGENET_LINEAR, augment.IMAGENET_TEST_RESIZE),
}
# the image size of a dataset when neither the flag nor the recipe sets it
IMAGE_SIZES = {'cifar10': 32, 'cifar100': 32, 'stl10': 96, 'folder': 32}


def apply(args, preset):
    """Fill every flag of `preset` that the command line left out (None) with the preset's value; returns
    their names."""
    taken = []
    for flag, value in preset.items():
        if getattr(args, flag) is None and value is not None:
            setattr(args, flag, value)
            taken.append(flag)
    return taken
