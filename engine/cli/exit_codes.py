"""The headless commands' exit codes. A user's mistake ends in one line on stderr and one of these, never a
traceback."""

EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected failure (a bug)
EXIT_CONFIG = 2  # bad usage or config (also `fuse --out` onto an existing file or folder; a resume refused)
EXIT_DATA = 3  # bad dataset
EXIT_MODEL = 4  # model or adapter cannot be loaded (also an adapter with NaN/inf values or scale)
EXIT_TRAINING = 5  # training failed (diverged, disk full; the last good checkpoint is kept), or a fused model
# came out wrong
EXIT_INTERRUPTED = 130  # Ctrl+C or SIGTERM (a checkpoint was saved first)
