"""Command line: ``parser`` builds arguments, ``run`` orchestrates."""
