"""The request log schema's revisions, oldest first."""
