"""The command-line shell: click commands that parse options, call a job, print, and map errors to exit codes."""
