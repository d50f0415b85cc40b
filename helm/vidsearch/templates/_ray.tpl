{{/* Ray pods (head and worker groups of the RayService, the ingest RayCluster and the
trainer's RayJob). KubeRay adds `ray start` to the container's command itself (through
bash, which the image has); the chart supplies the image, the vidsearch environment,
volumes, security, resources and probes.

Called with (dict "root" $ "component" "serve" "role" "head"|"worker" "group" $group
"gpus" n "serve" bool "autoscaling" bool "spread" bool). */}}
{{- define "vidsearch.rayPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "vidsearch.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    vidsearch.io/ray-node: {{ .role }}
  annotations:
    {{- /* The settings file is read at start: a changed one must replace the pods (a new
    serving cluster for the RayService, Recreate for the ingest RayCluster). */}}
    checksum/settings: {{ include (print $root.Template.BasePath "/settings.yaml") $root | sha256sum }}
    {{- with $root.Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "vidsearch.serviceAccountName" $root }}
  {{- /* KubeRay runs the Ray autoscaler as a container of the head pod and binds its Role
  (pods, rayclusters) to the head's ServiceAccount; the autoscaler reads the mounted token
  at start and exits without it. No other Ray pod calls the API. */}}
  automountServiceAccountToken: {{ and (eq .role "head") (default false .autoscaling) }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "vidsearch.podSecurityContext" $root | nindent 4 }}
  {{- include "vidsearch.placement" (dict "root" $root "group" .group "gpus" .gpus) | nindent 2 }}
  {{- if .spread }}
  {{- /* Soft: a cluster smaller than its node pool still schedules. Per Ray cluster
  (matchLabelKeys), so a RayService upgrade's new cluster spreads on its own. */}}
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "vidsearch.selectorLabels" $root | nindent 10 }}
          app.kubernetes.io/component: {{ .component }}
          vidsearch.io/ray-node: {{ .role }}
      matchLabelKeys: [ray.io/cluster]
  {{- end }}
  containers:
    - name: ray-{{ .role }}
      image: {{ include "vidsearch.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- include "vidsearch.containerSecurityContext" $root | nindent 8 }}
      env:
        {{- include "vidsearch.env" $root | nindent 8 }}
      {{- with (include "vidsearch.envFrom" $root) }}
      envFrom:
        {{- . | nindent 8 }}
      {{- end }}
      ports:
        {{- if eq .role "head" }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: metrics, containerPort: 8080}
        {{- if .serve }}
        - {name: grpc, containerPort: {{ $root.Values.serve.grpcPort }}}
        {{- /* KubeRay's incremental upgrade builds its per-cluster Services and routes its
        Gateway from the head's port named "serve" (Serve's HTTP proxy). */}}
        {{- if include "vidsearch.incrementalUpgrade" $root }}
        - {name: serve, containerPort: {{ $root.Values.serve.httpPort }}}
        {{- else if $root.Values.serve.web.enabled }}
        - {name: http, containerPort: {{ $root.Values.serve.httpPort }}}
        {{- end }}
        {{- end }}
      resources:
        {{- include "vidsearch.gpuResources" (dict "resources" .group.resources "gpus" (default 0 .gpus)) | nindent 8 }}
      {{- /* KubeRay's own default probes, written out so that they are visible and
      reviewed: the raylet (and, on the head, the GCS) must answer; a serving worker is
      ready only once its Serve proxy is. */}}
      livenessProbe:
        exec:
          command:
            - bash
            - -c
            - {{ include "vidsearch.rayHealth" (dict "role" .role "serve" false "httpPort" $root.Values.serve.httpPort) | quote }}
        initialDelaySeconds: 30
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 12
      readinessProbe:
        exec:
          command:
            - bash
            - -c
            - {{ include "vidsearch.rayHealth" (dict "role" .role "serve" (and .serve (eq .role "worker")) "httpPort" $root.Values.serve.httpPort) | quote }}
        initialDelaySeconds: 10
        periodSeconds: 5
        timeoutSeconds: 5
        failureThreshold: 10
      volumeMounts:
        {{- include "vidsearch.volumeMounts" $root | nindent 8 }}
        - name: dshm
          mountPath: /dev/shm
        {{- if .extraMounts }}
        {{- toYaml .extraMounts | nindent 8 }}
        {{- end }}
  volumes:
    {{- include "vidsearch.volumes" $root | nindent 4 }}
    # Ray's object store lives in shared memory; the container default (64 MiB) is too small.
    - name: dshm
      emptyDir:
        medium: Memory
    {{- if .extraVolumes }}
    {{- toYaml .extraVolumes | nindent 4 }}
    {{- end }}
{{- end -}}

{{- define "vidsearch.rayHealth" -}}
{{- $checks := list "wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep -q success" -}}
{{- if eq .role "head" -}}
{{- $checks = append $checks "wget -T 2 -q -O- http://localhost:8265/api/gcs_healthz | grep -q success" -}}
{{- end -}}
{{- if .serve -}}
{{- /* Serve's HTTP proxy runs on every node whether or not the page is deployed. */ -}}
{{- $checks = append $checks (printf "wget -T 2 -q -O- http://localhost:%v/-/healthz | grep -q success" .httpPort) -}}
{{- end -}}
{{- join " && " $checks -}}
{{- end -}}

{{/* rayStartParams: metrics on a fixed port (scraped by the ServiceMonitor); the head
of a cluster with workers schedules no work itself (num-cpus 0). */}}
{{- define "vidsearch.headStartParams" -}}
dashboard-host: "0.0.0.0"
metrics-export-port: "8080"
num-cpus: "0"
{{- end -}}

{{- define "vidsearch.workerStartParams" -}}
metrics-export-port: "8080"
{{- end -}}

{{/* The Ray autoscaler's container, locked down like the rest (KubeRay runs it in the head pod). */}}
{{- define "vidsearch.autoscalerOptions" -}}
upscalingMode: Default
idleTimeoutSeconds: 300
image: {{ include "vidsearch.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
resources:
  requests: {cpu: 200m, memory: 512Mi}
  limits: {cpu: 500m, memory: 512Mi}
securityContext:
  {{- include "vidsearch.containerSecurityContext" . | nindent 2 }}
{{- end -}}
