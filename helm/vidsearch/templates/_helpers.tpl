{{/* Names, labels and the pieces every vidsearch pod shares. */}}

{{- define "vidsearch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Kept to 40 characters: KubeRay appends suffixes (-raycluster-xxxxx-head-svc) and a
Service name must stay within 63. */}}
{{- define "vidsearch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "vidsearch.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "vidsearch.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vidsearch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vidsearch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vidsearch.labels" -}}
{{ include "vidsearch.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "vidsearch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "vidsearch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vidsearch.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vidsearch.apiKeySecret" -}}
{{- default (include "vidsearch.generatedSecret" .) .Values.apiKey.existingSecret -}}
{{- end -}}

{{- define "vidsearch.apiKeySecretKey" -}}
{{- ternary .Values.apiKey.secretKey "api-key" (ne .Values.apiKey.existingSecret "") -}}
{{- end -}}

{{/* The generated Secret: the gRPC API key (unless one is named) and the embedded Qdrant's key. */}}
{{- define "vidsearch.generatedSecret" -}}
{{- printf "%s-keys" (include "vidsearch.fullname" .) -}}
{{- end -}}

{{- define "vidsearch.kafkaBootstrap" -}}
{{- if .Values.kafka.embedded.enabled -}}
{{- /* Namespace-qualified: producers in other namespaces use the same advertised name. */ -}}
{{- printf "%s-kafka.%s.svc:9092" (include "vidsearch.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.kafka.external.bootstrap -}}
{{- end -}}
{{- end -}}

{{- define "vidsearch.qdrantUrl" -}}
{{- if .Values.qdrant.embedded.enabled -}}
{{- printf "http://%s-qdrant:6333" (include "vidsearch.fullname" .) -}}
{{- else -}}
{{- .Values.qdrant.external.url -}}
{{- end -}}
{{- end -}}

{{- define "vidsearch.registryRoot" -}}
{{- default .Values.registry.mountPath .Values.registry.url -}}
{{- end -}}

{{- define "vidsearch.registryClaim" -}}
{{- default (printf "%s-registry" (include "vidsearch.fullname" .)) .Values.registry.pvc.existingClaim -}}
{{- end -}}

{{/* Ray Client address of the ingest RayCluster (KubeRay names its head Service <cluster>-head-svc). */}}
{{/* KubeRay's incremental RayService upgrade (its serve Services are per cluster, its Gateway
is HTTP only), for the templates that differ with it. */}}
{{- define "vidsearch.incrementalUpgrade" -}}
{{- if eq .Values.serve.upgrade.strategy "NewClusterWithIncrementalUpgrade" }}true{{ end -}}
{{- end -}}

{{- define "vidsearch.ingestRayAddress" -}}
{{- printf "ray://%s-ingest-head-svc:10001" (include "vidsearch.fullname" .) -}}
{{- end -}}

{{/* Checks no schema can express: what a user must provide (each would otherwise leave
pods pending or idle without a message), and values compared with each other. */}}
{{- define "vidsearch.validate" -}}
{{- if not .Values.image.repository -}}
{{- fail "image.repository is required: no public vidsearch image exists; build deploy/Dockerfile, push it to a registry the cluster pulls from and set image.repository (and image.tag)" -}}
{{- end -}}
{{- if and (not .Values.registry.url) (not .Values.registry.pvc.existingClaim) (has "ReadWriteMany" .Values.registry.pvc.accessModes) (not .Values.registry.pvc.storageClass) -}}
{{- fail "registry.pvc.storageClass is required for the ReadWriteMany registry claim (the default classes of most clouds can't provision ReadWriteMany, and the claim would stay Pending): name an NFS, EFS, Filestore or Azure Files class, or set registry.url (s3://, gs://) or registry.pvc.existingClaim" -}}
{{- end -}}
{{- if and (not .Values.videos.existingClaim) (not (without .Values.videos.allowedSchemes "file")) -}}
{{- fail "no video source: set videos.existingClaim (a claim holding the videos, mounted read-only at videos.mountPath for file uris) or allow http, https or s3 in videos.allowedSchemes (with videos.allowedPrefixes)" -}}
{{- end -}}
{{- if gt (int .Values.ingest.replicas) (int .Values.kafka.partitions) -}}
{{- fail (printf "ingest.replicas (%d) must not exceed kafka.partitions (%d): a consumer group gives each partition to one worker, so the extra workers would sit idle" (int .Values.ingest.replicas) (int .Values.kafka.partitions)) -}}
{{- end -}}
{{- if and .Values.kafka.embedded.enabled (not .Values.kafka.createTopics) -}}
{{- fail "kafka.createTopics=false needs an external Kafka (kafka.external.bootstrap, kafka.embedded.enabled=false) whose topics exist: nothing would create the embedded Kafka's" -}}
{{- end -}}
{{- if and .Values.kafka.embedded.enabled .Values.kafka.external.bootstrap -}}
{{- fail "set either kafka.external.bootstrap or kafka.embedded.enabled=true, not both" -}}
{{- end -}}
{{- with .Values.serve.upgrade -}}
{{- if eq .strategy "NewClusterWithIncrementalUpgrade" -}}
{{- if not $.Values.serve.rayAutoscaling -}}
{{- fail "serve.upgrade.strategy NewClusterWithIncrementalUpgrade needs serve.rayAutoscaling=true: KubeRay grows the new cluster step by step through the Ray autoscaler (and refuses the RayService without it)" -}}
{{- end -}}
{{- if not .gatewayClassName -}}
{{- fail "serve.upgrade.strategy NewClusterWithIncrementalUpgrade needs serve.upgrade.gatewayClassName: KubeRay moves the traffic through a Gateway API Gateway of that class" -}}
{{- end -}}
{{- if gt (int .stepSizePercent) (int .maxSurgePercent) -}}
{{- fail (printf "serve.upgrade.stepSizePercent (%d) must not exceed serve.upgrade.maxSurgePercent (%d): KubeRay moves traffic only onto capacity the new cluster already has" (int .stepSizePercent) (int .maxSurgePercent)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with .Values.serve.gcsFaultTolerance -}}
{{- if and .enabled .embeddedRedis.enabled .redisAddress -}}
{{- fail "set either serve.gcsFaultTolerance.redisAddress or serve.gcsFaultTolerance.embeddedRedis.enabled=true, not both" -}}
{{- end -}}
{{- if and .enabled (not .redisAddress) (not .embeddedRedis.enabled) -}}
{{- fail "serve.gcsFaultTolerance.enabled needs a Redis: set serve.gcsFaultTolerance.redisAddress (yours, host:port) or serve.gcsFaultTolerance.embeddedRedis.enabled=true (one the release runs)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.qdrant.embedded.enabled .Values.qdrant.external.url -}}
{{- fail "set either qdrant.external.url or qdrant.embedded.enabled=true, not both" -}}
{{- end -}}
{{- range $name, $group := dict "serve.workers" .Values.serve.workers "ingest.cluster.workers" .Values.ingest.cluster.workers -}}
{{- if or (gt (int $group.minReplicas) (int $group.replicas)) (gt (int $group.replicas) (int $group.maxReplicas)) -}}
{{- fail (printf "%s: need minReplicas <= replicas <= maxReplicas (got %d, %d, %d)" $name (int $group.minReplicas) (int $group.replicas) (int $group.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- /* Both Serve proxies bind on every serving pod, beside Ray's own ports. */ -}}
{{- $taken := dict "6379" "Ray's GCS" "8080" "Ray's metrics" "8265" "Ray's dashboard" "10001" "Ray Client" "52365" "Ray's dashboard agent" (toString (int .Values.serve.grpcPort)) "serve.grpcPort" -}}
{{- with get $taken (toString (int .Values.serve.httpPort)) -}}
{{- fail (printf "serve.httpPort (%d) is already the port of %s on the serving pods: pick another" (int $.Values.serve.httpPort) .) -}}
{{- end -}}
{{- if and .Values.trainer.enabled (not .Values.registry.url) (has "ReadWriteOnce" .Values.registry.pvc.accessModes) (not .Values.registry.pvc.existingClaim) -}}
{{- fail "the trainer publishes into the registry from other pods than the services: registry.pvc.accessModes needs ReadWriteMany (or use registry.url)" -}}
{{- end -}}
{{- end -}}

{{/* Ray's CPUs on a pod: KubeRay passes the container's CPU limit (else its request) to
`ray start --num-cpus`, rounded up to a whole number. Called with a resources map. */}}
{{- define "vidsearch.rayCpus" -}}
{{- $quantity := toString (coalesce (dig "limits" "cpu" "" .) (dig "requests" "cpu" "" .) "0") -}}
{{- if hasSuffix "m" $quantity -}}
{{- ceil (divf (float64 (trimSuffix "m" $quantity)) 1000) -}}
{{- else -}}
{{- ceil (float64 $quantity) -}}
{{- end -}}
{{- end -}}

{{/* Serve's replicas at their max_replicas must fit the serving worker group at its most
pods (maxReplicas with serve.rayAutoscaling, else replicas): replicas beyond that stay
pending with no warning. The head schedules none (num-cpus 0). Called with (dict "root" $
"serve" <the rendered Serve config>). */}}
{{- define "vidsearch.validateServeCapacity" -}}
{{- $root := .root -}}
{{- $workers := $root.Values.serve.workers -}}
{{- /* What each application builder asks per replica when the config sets no
ray_actor_options (services/query/app.py, services/reranker/app.py, services/web/app.py);
tests/test_helm_behaviour.py checks these against the builders. */ -}}
{{- $builderCpus := dict "SearchIngress" 1.0 "Reranker" 1.0 "SearchWeb" 0.5 -}}
{{- $cpus := 0.0 -}}
{{- $gpus := 0.0 -}}
{{- $parts := list -}}
{{- range $app := .serve.applications -}}
{{- range $deployment := $app.deployments -}}
{{- $replicas := float64 (default 1 $deployment.num_replicas) -}}
{{- if $deployment.autoscaling_config -}}
{{- $replicas = float64 (default 1 $deployment.autoscaling_config.max_replicas) -}}
{{- end -}}
{{- $options := default dict $deployment.ray_actor_options -}}
{{- $cpu := float64 (get $builderCpus $deployment.name | default 1) -}}
{{- if hasKey $options "num_cpus" -}}
{{- $cpu = float64 $options.num_cpus -}}
{{- end -}}
{{- $gpu := float64 (default 0 $options.num_gpus) -}}
{{- /* The reranker's builder adds serve.reranker_num_gpus when the cluster has GPUs. */ -}}
{{- if and (eq $deployment.name "Reranker") (not (hasKey $options "num_gpus")) (gt (int $workers.gpus) 0) -}}
{{- $gpu = float64 $root.Values.serve.reranker.numGpus -}}
{{- end -}}
{{- $cpus = addf $cpus (mulf $replicas $cpu) -}}
{{- $gpus = addf $gpus (mulf $replicas $gpu) -}}
{{- $parts = append $parts (printf "%s %v x %v CPU" $deployment.name $replicas $cpu) -}}
{{- end -}}
{{- end -}}
{{- $pods := ternary $workers.maxReplicas $workers.replicas $root.Values.serve.rayAutoscaling | int -}}
{{- $podCpus := include "vidsearch.rayCpus" $workers.resources | float64 -}}
{{- if gt $cpus (mulf $pods $podCpus) -}}
{{- fail (printf "serve: at max_replicas Serve needs %v CPUs (%s) but serve.workers gives Ray %v (%d pods x %v CPUs, from the CPU limit): raise serve.workers.%s or resources.limits.cpu, or lower max_replicas in serve.*.autoscaling" $cpus (join ", " $parts) (mulf $pods $podCpus) $pods $podCpus (ternary "maxReplicas" "replicas" $root.Values.serve.rayAutoscaling)) -}}
{{- end -}}
{{- if gt $gpus (mulf $pods (int $workers.gpus)) -}}
{{- fail (printf "serve: at max_replicas the Reranker needs %v GPUs (serve.reranker.numGpus %v each) but serve.workers gives Ray %d (%d pods x %d GPUs): raise serve.workers.%s or gpus, or lower serve.reranker.autoscaling.max_replicas or numGpus" $gpus $root.Values.serve.reranker.numGpus (mul $pods (int $workers.gpus)) $pods (int $workers.gpus) (ternary "maxReplicas" "replicas" $root.Values.serve.rayAutoscaling)) -}}
{{- end -}}
{{- end -}}

{{/* Pod-level security: non-root, RuntimeDefault seccomp, volumes owned by the group. */}}
{{- define "vidsearch.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsGroup }}
fsGroup: {{ .Values.security.runAsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security; readOnlyRootFilesystem holds for every vidsearch process
(writable paths are emptyDirs: /tmp for Ray's session files and caches). */}}
{{- define "vidsearch.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The environment of every vidsearch process: endpoints and secrets (as references). */}}
{{- /* The embedded Qdrant's key: a Secret the user names (stable under helm template and
GitOps tools, which cannot lookup), else the release's generated one. */ -}}
{{- define "vidsearch.qdrantKeySecret" -}}
{{- .Values.qdrant.embedded.apiKeySecret.name | default (include "vidsearch.generatedSecret" .) -}}
{{- end -}}
{{- define "vidsearch.qdrantKeySecretKey" -}}
{{- if .Values.qdrant.embedded.apiKeySecret.name }}{{ .Values.qdrant.embedded.apiKeySecret.key }}{{ else }}qdrant-api-key{{ end -}}
{{- end -}}

{{- /* GCS fault tolerance's Redis: the chart's own (serve.gcsFaultTolerance.embeddedRedis)
or the one at redisAddress. The embedded one's password: redisPasswordSecret when it names
a Secret, else the release's generated one. */ -}}
{{- define "vidsearch.embeddedRedis" -}}
{{- with .Values.serve.gcsFaultTolerance }}{{ if and .enabled .embeddedRedis.enabled }}true{{ end }}{{ end -}}
{{- end -}}
{{- define "vidsearch.redisName" -}}
{{- printf "%s-redis" (include "vidsearch.fullname" .) -}}
{{- end -}}
{{- define "vidsearch.redisAddress" -}}
{{- if include "vidsearch.embeddedRedis" . -}}
{{- printf "%s.%s.svc:6379" (include "vidsearch.redisName" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.serve.gcsFaultTolerance.redisAddress -}}
{{- end -}}
{{- end -}}
{{- define "vidsearch.redisPasswordSecret" -}}
{{- .Values.serve.gcsFaultTolerance.redisPasswordSecret.name | default (include "vidsearch.generatedSecret" .) -}}
{{- end -}}
{{- define "vidsearch.redisPasswordSecretKey" -}}
{{- with .Values.serve.gcsFaultTolerance.redisPasswordSecret }}{{ if .name }}{{ .key }}{{ else }}redis-password{{ end }}{{ end -}}
{{- end -}}

{{- define "vidsearch.env" -}}
- name: VIDSEARCH_CONFIG
  value: /etc/vidsearch/settings.yaml
- name: HOME
  value: /tmp
- name: KAFKA_BOOTSTRAP
  value: {{ include "vidsearch.kafkaBootstrap" . | quote }}
- name: QDRANT_URL
  value: {{ include "vidsearch.qdrantUrl" . | quote }}
- name: QDRANT_API_KEY
  valueFrom:
    secretKeyRef:
{{- if .Values.qdrant.embedded.enabled }}
      name: {{ include "vidsearch.qdrantKeySecret" . }}
      key: {{ include "vidsearch.qdrantKeySecretKey" . }}
{{- else }}
      name: {{ .Values.qdrant.external.apiKeySecret.name }}
      key: {{ .Values.qdrant.external.apiKeySecret.key }}
{{- end }}
{{- if .Values.apiKey.enabled }}
- name: VIDSEARCH_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "vidsearch.apiKeySecret" . }}
      key: {{ include "vidsearch.apiKeySecretKey" . }}
{{- end }}
{{- if not .Values.kafka.embedded.enabled }}
{{- with .Values.kafka.external }}
- name: VIDSEARCH_BROKER__SECURITY_PROTOCOL
  value: {{ .securityProtocol | quote }}
{{- if hasPrefix "SASL_" .securityProtocol }}
- name: VIDSEARCH_BROKER__SASL_MECHANISM
  value: {{ .sasl.mechanism | quote }}
{{- /* A username is no secret, and a Strimzi KafkaUser's Secret has no key for it
(only password and sasl.jaas.config): a literal one takes the place of the key. */}}
- name: VIDSEARCH_BROKER__SASL_USERNAME
{{- if .sasl.username }}
  value: {{ .sasl.username | quote }}
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ .sasl.existingSecret }}
      key: {{ .sasl.usernameKey }}
{{- end }}
- name: VIDSEARCH_BROKER__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .sasl.existingSecret }}
      key: {{ .sasl.passwordKey }}
{{- end }}
{{- if and .tls.caSecret (hasSuffix "SSL" .securityProtocol) }}
- name: VIDSEARCH_BROKER__SSL_CAFILE
  value: /var/run/secrets/vidsearch/kafka-ca/{{ .tls.caKey }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "vidsearch.envFrom" -}}
{{- if .Values.registry.url }}
- secretRef:
    name: {{ .Values.registry.credentialsSecret }}
{{- end }}
{{- end -}}

{{/* Volumes of every vidsearch pod: settings, scratch, shared memory, registry, videos, CAs. */}}
{{- define "vidsearch.volumes" -}}
- name: settings
  configMap:
    name: {{ include "vidsearch.fullname" . }}-settings
- name: tmp
  emptyDir: {}
{{- if not .Values.registry.url }}
- name: registry
  persistentVolumeClaim:
    claimName: {{ include "vidsearch.registryClaim" . }}
{{- else }}
- name: registry-credentials
  secret:
    secretName: {{ .Values.registry.credentialsSecret }}
{{- end }}
{{- if .Values.videos.existingClaim }}
- name: videos
  persistentVolumeClaim:
    claimName: {{ .Values.videos.existingClaim }}
    readOnly: true
{{- end }}
{{- if and (not .Values.kafka.embedded.enabled) .Values.kafka.external.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.external.tls.caSecret }}
{{- end }}
{{- end -}}

{{- define "vidsearch.volumeMounts" -}}
- name: settings
  mountPath: /etc/vidsearch
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if not .Values.registry.url }}
- name: registry
  mountPath: {{ .Values.registry.mountPath }}
{{- else }}
- name: registry-credentials
  mountPath: /var/run/secrets/vidsearch/registry
  readOnly: true
{{- end }}
{{- if .Values.videos.existingClaim }}
- name: videos
  mountPath: {{ .Values.videos.mountPath }}
  readOnly: true
{{- end }}
{{- if and (not .Values.kafka.embedded.enabled) .Values.kafka.external.tls.caSecret }}
- name: kafka-ca
  mountPath: /var/run/secrets/vidsearch/kafka-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* Node placement: the group's own field where it sets one (an explicit [] or {} clears
it), else placement.gpu's for a pod that requests GPUs and placement.cpu's for any other
(the Ray heads, CPU workers, the ingest workers), so CPU pods never wait for GPU nodes.
Unset group fields are null: sprig's `default` would take an explicit empty list for
unset. Called with (dict "root" $ "group" $group "gpus" n). */}}
{{- define "vidsearch.placement" -}}
{{- $group := .group -}}
{{- $inherited := index .root.Values.placement (ternary "gpu" "cpu" (gt (int (default 0 .gpus)) 0)) -}}
{{- range $field := list "nodeSelector" "tolerations" "affinity" -}}
{{- $value := index $inherited $field -}}
{{- if not (kindIs "invalid" (index $group $field)) -}}
{{- $value = index $group $field -}}
{{- end -}}
{{- with $value }}
{{ $field }}:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* Resources with the GPU count added to requests and limits. Called with (dict "resources" r "gpus" n). */}}
{{- define "vidsearch.gpuResources" -}}
{{- $r := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $r.requests "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $r.limits "nvidia.com/gpu" (int .gpus) -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}
