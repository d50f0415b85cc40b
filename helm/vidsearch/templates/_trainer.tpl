{{/* The trainer's RayJob: `vidsearch train` as the entrypoint of a cluster KubeRay creates
for the run and deletes after it. The registry (PVC or object store) is the services'
one, so a gated publish and the re-index it starts are what the services then serve.
Each submission gets its own run directory (a timestamp): a scheduled run trains on the
data as it is then instead of resuming the last finished run. Called with (dict "root" $
"name" N "hook" bool): an empty name becomes generateName (for `kubectl create`). */}}
{{- define "vidsearch.rayJob" -}}
{{- $name := .name -}}
{{- $hook := .hook -}}
{{- with .root -}}
{{- $fullname := include "vidsearch.fullname" . -}}
{{- $trainerMounts := list (dict "name" "train-config" "mountPath" "/etc/vidsearch-train" "readOnly" true) (dict "name" "train-data" "mountPath" "/data/train" "readOnly" true) (dict "name" "runs" "mountPath" "/runs") -}}
{{- $trainerVolumes := list (dict "name" "train-config" "configMap" (dict "name" (printf "%s-train" $fullname))) (dict "name" "train-data" "persistentVolumeClaim" (dict "claimName" .Values.trainer.dataClaim "readOnly" true)) -}}
{{- if .Values.trainer.runsClaim -}}
{{- $trainerVolumes = append $trainerVolumes (dict "name" "runs" "persistentVolumeClaim" (dict "claimName" .Values.trainer.runsClaim)) -}}
{{- else -}}
{{- /* Run directories on the registry's claim: every Ray Train worker must see them. */ -}}
{{- $trainerMounts = list (index $trainerMounts 0) (index $trainerMounts 1) (dict "name" "registry" "mountPath" "/runs" "subPath" "runs") -}}
{{- end -}}
{{- $workers := .Values.trainer.workers -}}
apiVersion: ray.io/v1
kind: RayJob
metadata:
  {{- if $name }}
  name: {{ $name }}
  {{- else }}
  generateName: {{ $fullname }}-train-
  {{- end }}
  {{- if $hook }}
  annotations:
    # Helm creates it once, after `helm install` only (an upgrade runs no post-install
    # hook); before-hook-creation would delete it only before a re-install's copy, so its
    # deletionRules below remove it, like every trainer RayJob.
    helm.sh/hook: post-install
    helm.sh/hook-weight: "10"
    helm.sh/hook-delete-policy: before-hook-creation
  {{- end }}
  labels:
    {{- include "vidsearch.labels" . | nindent 4 }}
    app.kubernetes.io/component: trainer
spec:
  entrypoint: >-
    vidsearch train --config /etc/vidsearch-train/run.yaml
    --run-dir /runs/{{ .Values.trainer.runConfig.name }}-$(date -u +%Y%m%dT%H%M%S)
    --workers {{ $workers.replicas }}{{ if gt (int $workers.gpus) 0 }} --gpu{{ end }}
  {{- /* KubeRay (RayJobDeletionPolicy, on by default from 1.6) deletes the cluster
  ttlSecondsAfterFinished after the run ends and the RayJob itself keepFinishedSeconds
  after, so finished RayJobs do not pile up, whoever created them. deletionRules exclude
  shutdownAfterJobFinishes; the jobDeploymentStatus rule covers runs that never got a
  terminal Ray job status (submission failed, activeDeadlineSeconds exceeded). */}}
  deletionStrategy:
    deletionRules:
      {{- range $condition := list (dict "jobStatus" "SUCCEEDED") (dict "jobStatus" "FAILED") (dict "jobDeploymentStatus" "Failed") }}
      - policy: DeleteCluster
        condition: {{ merge (dict "ttlSeconds" (int $.root.Values.trainer.ttlSecondsAfterFinished)) $condition | toJson }}
      - policy: DeleteSelf
        condition: {{ merge (dict "ttlSeconds" (int $.root.Values.trainer.keepFinishedSeconds)) $condition | toJson }}
      {{- end }}
  activeDeadlineSeconds: {{ .Values.trainer.activeDeadlineSeconds }}
  backoffLimit: 0
  submissionMode: K8sJobMode
  submitterPodTemplate:
    metadata:
      labels:
        {{- include "vidsearch.labels" . | nindent 8 }}
        app.kubernetes.io/component: trainer-submitter
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "vidsearch.serviceAccountName" . }}
      automountServiceAccountToken: false
      securityContext:
        {{- include "vidsearch.podSecurityContext" . | nindent 8 }}
      containers:
        # KubeRay fills in the `ray job submit` command of this container.
        - name: ray-job-submitter
          image: {{ include "vidsearch.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          env:
            - {name: HOME, value: /tmp}
          securityContext:
            {{- include "vidsearch.containerSecurityContext" . | nindent 12 }}
          resources:
            requests: {cpu: 200m, memory: 256Mi}
            limits: {cpu: 500m, memory: 512Mi}
          volumeMounts:
            - {name: tmp, mountPath: /tmp}
      volumes:
        - name: tmp
          emptyDir: {}
  rayClusterSpec:
    rayVersion: {{ .Values.rayVersion | quote }}
    headGroupSpec:
      rayStartParams:
        {{- include "vidsearch.headStartParams" . | nindent 8 }}
      template:
        {{- include "vidsearch.rayPodTemplate" (dict "root" . "component" "trainer" "role" "head" "group" .Values.trainer.head "gpus" 0 "serve" false "extraMounts" $trainerMounts "extraVolumes" $trainerVolumes) | nindent 8 }}
    workerGroupSpecs:
      - groupName: {{ ternary "gpu" "cpu" (gt (int $workers.gpus) 0) }}
        replicas: {{ $workers.replicas }}
        minReplicas: {{ $workers.replicas }}
        maxReplicas: {{ $workers.replicas }}
        rayStartParams:
          {{- include "vidsearch.workerStartParams" . | nindent 10 }}
        template:
          {{- include "vidsearch.rayPodTemplate" (dict "root" . "component" "trainer" "role" "worker" "group" $workers "gpus" $workers.gpus "serve" false "extraMounts" $trainerMounts "extraVolumes" $trainerVolumes) | nindent 10 }}
{{- end -}}
{{- end -}}
