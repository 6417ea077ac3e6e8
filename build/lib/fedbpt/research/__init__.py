"""Research and testing tools, never shipped in a job unless asked: synthetic task, random models, faults."""
