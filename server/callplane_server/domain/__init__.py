"""Domain: records, rules and validation shared by the services. No SQL and no gRPC here."""
