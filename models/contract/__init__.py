"""The data contract: the three tables every stage reads, and the task declaration that names their behaviours."""
