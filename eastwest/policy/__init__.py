"""NetworkPolicy from observed traffic: `semantics` (the Kubernetes rules, pure), `load`
(policy files checked against the Kubernetes OpenAPI schema), `check` (observed edges against a
policy set) and `suggest` (the policies that allow exactly the observed edges)."""
