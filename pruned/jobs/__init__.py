"""What jobs run on this node: the JobSource protocol, its sources, and the ended-job history."""
