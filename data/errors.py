"""Errors about the data sources of embedded tasks, naming the task and the file."""


class SourceError(RuntimeError):
  """A source file of an embedded task is missing or corrupt."""

  def __init__(self, task: str, path, problem: str, hint: str = ""):
    self.task, self.path = task, str(path)
    message = f"task {task!r}: source file {self.path}: {problem}"
    super().__init__(message + (f" ({hint})" if hint else ""))
