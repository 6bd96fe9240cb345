"""noyau's JupyterLab extension (prebuilt): the batch job behind a notebook's
noyau kernel, in the status bar and a side panel, and the "Hub" menu under
`noyau hub`. This package only carries the extension's files."""

try:
    from ._version import __version__
except ImportError:  # a source checkout that was never built
    __version__ = "dev"


def _jupyter_labextension_paths():
    return [{"src": "labextension", "dest": "noyau-jupyterlab"}]
