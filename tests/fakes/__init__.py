"""In-memory fakes of our own ports, shared by the test packages."""
