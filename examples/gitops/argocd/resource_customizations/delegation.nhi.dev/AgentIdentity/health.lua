-- Argo CD health check for AgentIdentity (delegation.nhi.dev/v1alpha1), from delegation-operator.
-- Install it as argocd-cm key resource.customizations.health.delegation.nhi.dev_AgentIdentity
-- (examples/gitops/argocd/argocd-cm.yaml); it needs only Lua's base library. Mapping of the Ready
-- condition the operator writes (docs/gitops.md):
--   Healthy      Ready=True for the current generation: the agent can receive grants
--   Progressing  no status or no Ready condition yet; the status is for an older generation; being
--                deleted; Ready=Unknown
--   Suspended    spec.suspended is true (Ready=False, reason Suspended): every token naming it is revoked
--   Degraded     any other Ready=False (InvalidSpec, or a reason this check does not know)
local function explain(condition)
  local reason = condition.reason
  if reason == nil or reason == "" then
    reason = "Ready=" .. tostring(condition.status)
  end
  if condition.message ~= nil and condition.message ~= "" then
    return reason .. ": " .. condition.message
  end
  return reason
end

if obj.metadata.deletionTimestamp ~= nil then
  return {status = "Progressing", message = "Being deleted"}
end
local status = obj.status
if status == nil then
  return {status = "Progressing", message = "Waiting for the operator: no status yet"}
end
local ready = nil
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    end
  end
end
if ready == nil then
  return {status = "Progressing", message = "Waiting for the operator: no Ready condition yet"}
end
local generation = obj.metadata.generation
local observed = status.observedGeneration
if observed == nil then
  observed = ready.observedGeneration
end
if generation ~= nil and observed ~= nil and observed ~= generation then
  return {status = "Progressing", message = "Waiting for the operator to observe generation " .. generation .. " (the status is for generation " .. observed .. ")"}
end
if ready.status == "True" then
  return {status = "Healthy", message = explain(ready)}
end
if ready.status == "False" then
  if ready.reason == "Suspended" then
    return {status = "Suspended", message = explain(ready)}
  end
  return {status = "Degraded", message = explain(ready)}
end
return {status = "Progressing", message = explain(ready)}
