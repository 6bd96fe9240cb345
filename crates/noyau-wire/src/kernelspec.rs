//! Kernelspecs on the Jupyter paths (filled in by the kernelspec work).
