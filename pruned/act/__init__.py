"""What changes the world: kill, freeze, adopt, remove files, write the audit trail and metrics."""
