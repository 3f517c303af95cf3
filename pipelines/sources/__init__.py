"""Where images come from: the dataset types, the long-tailed subsets and the validation split, the demo set,
CIFAR and image folders, the ImageNet-LT and iNaturalist file lists, converted outputs and their manifest,
the .beton format, and image checking and decoding. `build.build_dataset` turns a DataConfig into a split."""
