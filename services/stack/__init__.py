"""The embedded single-machine stack: `vidsearch up` and `vidsearch demo`."""
